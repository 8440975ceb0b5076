"""Data: webdataset-style shards of encoded clips, the tools that write them, features, loaders."""
