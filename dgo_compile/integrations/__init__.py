"""Drop-in use of compiled denoisers inside other libraries' pipelines (`integrations.diffusers`)."""
