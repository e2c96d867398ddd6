"""The app's state on this server: the database and audit trail, users, uploaded datasets,
training jobs and their workers, feedback, recorded site validations, and health checks."""
