"""Forecast skill under model error: a fraternal-twin cohort and a scorer (issue 17, part 1).

    python -m bench.osse [--quick] [--seeds 1 2] [--heldout-seeds 101 102] [--service] ...

``truth``: a glioblastoma simulator richer than the twin's model (the twin never imports it);
``cohort``: virtual patients, their clinic and their events in the service's contract;
``scorer``: pure metric functions (relative errors, interval coverage, CRPS, Dice, centre of
mass); ``run``: the twin, through the service's normalizer, worker adaptation and engine, on
the cohort, beside persistence and a twin calibrated once; ``service``: the same through the
embedded broker, the faust normalizer and the worker; ``__main__``: the command.
"""
