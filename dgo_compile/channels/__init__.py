"""Channel pruning and its recovery (Diff-Pruning): Taylor importance over dependency groups, real
channel removal, and fine-tuning on the shipped digits, a user's image or latent folder, or by
distillation from the unpruned model.

Imports `core`, `frontend`, `schedules`, `backend` and the passes; never `search`.
"""
