"""Synthetic test data made by our own code: a CT phantom with known volumes (:mod:`.ct`) and
chest radiographs with or without an opacity (:mod:`.radiograph`)."""
