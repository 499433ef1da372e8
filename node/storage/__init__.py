"""Storage: instance and result files (:mod:`.files`), the tables (:mod:`.schema`) and every
query over them (:mod:`.db`, with the queue's state changes in :mod:`.queue` and the read-only
reports in :mod:`.reports`); retention (:mod:`.retention`).

Knows nothing of the stages: it stores and hands out rows.
"""
