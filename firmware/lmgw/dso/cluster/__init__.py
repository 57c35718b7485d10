"""The head-end as a cluster: the routing/presence/event back plane a DSO node talks to, and its edge.

``backplane.Backplane`` is the one interface; ``embedded`` is the single-process default,
``natsplane`` the NATS one (selected by a ``[cluster]`` section).  See docs/fleet.md.
"""
