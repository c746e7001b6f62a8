"""The rooms of one replica, the ticks that move their events, what connections are sent."""
