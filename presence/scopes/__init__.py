"""Identity scopes: anonymous identities told apart across replicas, beside the backplane."""
