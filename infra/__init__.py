"""Services recsqueeze runs on: embedded S3 (SeaweedFS), the Prefect server, settings."""
