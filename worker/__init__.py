"""refundq's runtime: settings, database, the job state machine, producer API, CLI, HTTP API."""
