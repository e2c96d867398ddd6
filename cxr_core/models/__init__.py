"""Model folders: the manifest, the architectures, verified loading, versions and the registry
pointer, and the classifier's own out-of-distribution gate."""
