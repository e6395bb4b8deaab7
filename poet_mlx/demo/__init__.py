"""The demos: the offline toy task and its tiny model."""
