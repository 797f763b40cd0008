"""Fine-tuning jobs: model conversion to MoE, tasks, features and metrics, the train and small_job entry points."""
