"""Ray: a local multi-node launcher, stage -> resource mapping and the Prefect task runner."""
