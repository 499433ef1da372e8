"""The HTTP face, served by ``ainode serve`` itself: the REST API (:mod:`.api`), the dashboard
and job pages (:mod:`.pages`, templates in ``templates/``), Prometheus metrics and health
(:mod:`.app`), tokens and roles (:mod:`.auth`).

No business logic here: every handler calls the functions the command line calls (the
database's reports, the queue's retries, the node's reload).
"""
