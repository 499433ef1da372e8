"""Routing: series and study completion and route matching (:mod:`.assemble`, run by the
:mod:`.assembler` stage), actions on model output (:mod:`.triage`), notifications to a webhook
(:mod:`.notify`) and the explanation of routes for files on disk (:mod:`.explain`).
"""
