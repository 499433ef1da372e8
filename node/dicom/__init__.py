"""The DICOM network: the listener (:mod:`.listener`) over a lean P-DATA transport
(:mod:`.transport`, :mod:`.server`) and TLS (:mod:`.tls`); C-STORE and C-ECHO out (:mod:`.deliver`) and the
delivery stage that drains the queue of results and forwards (:mod:`.dispatch`).
"""
