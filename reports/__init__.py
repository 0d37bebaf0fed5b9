"""Tables, manifests, figures and report bundles. Never runs a model."""
