"""`recforge tune`: Optuna hyperparameter search over `recforge fit` (docs/architecture.md §6).

``space`` reads and checks the search-space file, ``base_config`` reads the base config as
``fit`` does, ``study`` runs the study (one ``recforge fit`` subprocess per trial, an MLflow
parent run, the best config and plots), ``optuna_setup`` builds its pruner, sampler and storage,
``lifetime`` ends a trial with its tuner, ``report`` is the
callback inside each trial's ``fit`` that reports the validation metric per epoch and stops a
trial the pruner gives up on. Importing this package imports no Optuna: ``fit`` loads
``report`` only inside a trial.
"""
