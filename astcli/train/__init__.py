"""Training and fine-tuning: :mod:`~astcli.train.experiment` runs whole experiments (``ast train`` /
``ast finetune``); :func:`~astcli.train.trainer.fit` trains one model on one split with a resolved recipe."""
