"""Multiple instance learning benchmark for attention pools over sets (ABMIL, ACMIL): digit bags,
bag classifiers, training and the experiment behind ``mixattn mil``."""

from .data import Bags, BagsConfig, make_bags
from .experiment import run_mil_experiment
from .model import METHODS, MILClassifier, MILTrainConfig, bag_auc, evaluate, train_mil

__all__ = ["METHODS", "Bags", "BagsConfig", "MILClassifier", "MILTrainConfig", "bag_auc", "evaluate", "make_bags",
           "run_mil_experiment", "train_mil"]  # fmt: skip
