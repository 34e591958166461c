"""Recipes: Prefect flows, the stack composition and the CLI. No ML logic lives here."""
