"""seslib: Spectral Entropy Shaping (SES), the one helper every notebook of the suite imports (`import seslib as S`).

SES adds  lambda * sum_l alpha_l (H_l - beta * log d_l)^2  to the training loss, where H_l is the spectral entropy of
layer l's batch activations (pooled to [B, d]) and exp(H_l) its effective rank.

The package is a house of rooms, one topic each, listed here in data-flow order: a room imports only rooms above it
(tests/test_structure.py checks it, and that docs/code.md lists the same rooms).

  ses          the SES method: loss, hooks, the SES object (imports nothing else of the suite: copy it anywhere)
  util         the run contract, atomic writes, value checks, locks, device and precision, saving figures
  data         data sets on disk, loaders, the on-device loader and augmentations; GLUE and synthetic text
  models       ResNets, WRN-28-10, the ViTs, the toy MLP, BERT's pieces
  steps        one optimiser step of each run kind: what training runs and the memory tracer traces
  corruptions  CIFAR-10-C / Tiny-ImageNet-C generated or read, their evaluation, the paper's protocol
  runs         run folders and the stale rule
  estimates    time and GPU memory estimates, placement
  distributed  one run over many GPUs (torchrun + DDP)
  configs      run configs of every kind (image, text, toy): defaults, rules, resolve_config
  toy          the toy 2-D study (Exp 4): rings, the MLP, kappa(J), train_toy
  text         what a BERT-on-GLUE run (Exp 22) brings to the driver: model, data, optimisation, evaluation
  training     train(cfg) for every kind: the one driver, checkpoint and resume, result.json
  results      result files as rows, the paper's published numbers
  claims       claim metrics, intervals over seeds, the verdict rule
  power        a claim's power: the verdict rule simulated, seed SDs and their sources, seeds for 80 %
  tables       ours beside the paper
  figures      the report figures
  reports      report.md and SUMMARY.md
  explore      a finished run's model and its layers' spectra
  notebook     the notebook side: parameters, presets, plan_runs / run_plan
  command      `python -m seslib train --config run.json` (what torchrun launches)
  calibration  a GPU's measured steps, DDP, memory (gpu_check.json)   } the runner's rooms: imported by sesrun.py,
  batch        the batch runner (papermill jobs over GPUs)            } never by the rooms above nor here (a
  planning     the cost plan                                          } notebook needs none of papermill's side)
  budget       the power of every claim, a plan within a quota budget }
  kaggle       Kaggle packaging and continuation                      }
  cli          the command line of `python sesrun.py`                 }

This file is the public surface: every public name of the library rooms as `S.name`. A room's private helpers stay
in its module (`S.training._train_step`).
"""
from .ses import *  # noqa: F401,F403
from .util import *  # noqa: F401,F403
check_torch_pair()  # noqa: F405 - before any room imports torchvision: a mismatched install is one line, not a trace
from .data import *  # noqa: F401,F403
from .models import *  # noqa: F401,F403
from .steps import *  # noqa: F401,F403
from .corruptions import *  # noqa: F401,F403
from .runs import *  # noqa: F401,F403
from .estimates import *  # noqa: F401,F403
from .distributed import *  # noqa: F401,F403
from .configs import *  # noqa: F401,F403
from .toy import *  # noqa: F401,F403
from .text import *  # noqa: F401,F403
from .training import *  # noqa: F401,F403
from .results import *  # noqa: F401,F403
from .claims import *  # noqa: F401,F403
from .power import *  # noqa: F401,F403
from .tables import *  # noqa: F401,F403
from .figures import *  # noqa: F401,F403
from .reports import *  # noqa: F401,F403
from .explore import *  # noqa: F401,F403
from .notebook import *  # noqa: F401,F403
from .command import *  # noqa: F401,F403
from . import (ses, util, data, models, steps, corruptions, runs, estimates, distributed,  # noqa: F401
               configs, toy, text, training, results, claims, power, tables, figures, reports, explore, notebook,
               command)

LIBRARY_ROOMS = ("ses", "util", "data", "models", "steps", "corruptions", "runs", "estimates", "distributed", "configs",
                 "toy", "text", "training", "results", "claims", "power", "tables", "figures", "reports", "explore",
                 "notebook", "command")
RUNNER_ROOMS = ("calibration", "batch", "planning", "budget", "kaggle", "cli")
