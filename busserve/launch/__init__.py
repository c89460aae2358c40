"""Starting busserve processes: the supervised one-command stack (``busserve up``) and waiting for them to serve."""
