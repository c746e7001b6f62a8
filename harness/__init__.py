"""What the tests and the load tool share: the processes they start and own (replicas,
Redis servers and clusters) on free ports. Neither reaches into the other for them."""
