"""The run: run profiles, the papermill runner and cluster jobs."""
