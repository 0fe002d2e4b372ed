"""The Gradio studio: thin pages over `studio`, `pipelines` and the job queue."""
