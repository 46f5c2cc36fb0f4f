"""Doors into the training loops people already run; each module imports its framework when it is
imported, and the core never imports them:

* :mod:`clreg.integrations.lightning`: a Lightning callback (``pip install "clreg[lightning]"``);
* :mod:`clreg.integrations.transformers`: a Hugging Face ``Trainer`` callback and a ``Trainer`` that
  adds LwF to its loss (``pip install "clreg[transformers]"``);
* :mod:`clreg.integrations.causal_lm`: a causal language model's token logits as a task spec, and its
  dict batches as clreg's data (no framework needed);
* :mod:`clreg.integrations.peft`: regularizers over a PEFT model's adapter parameters alone, saved
  beside the adapter (``pip install "clreg[peft]"``).
"""
