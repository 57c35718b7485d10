"""Fleet jobs: one method sent to a selection of gateways, with progress, outcomes and cancel.

``model`` is the state machine (no I/O), ``selection`` which gateways, ``store`` where jobs are kept
(a directory on one node, JetStream KV with a lease in a cluster), ``runner`` the asyncio edge.
The HTTP routes are ``lmgw.dso.http.jobs_routes``; docs/operator-api.md describes the whole.
"""
