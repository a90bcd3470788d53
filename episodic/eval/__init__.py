"""Evaluation of encoders: the end-of-run quick evaluation of training (:mod:`.quick`), the protocols of
``python -m episodic.eval`` (:mod:`.linear`, :mod:`.semi`, :mod:`.fewshot`, :mod:`.knn`), the kNN monitor
of training (:class:`.knn.KNNMonitor`) and the end-of-run pictures (:mod:`.plots`)."""
