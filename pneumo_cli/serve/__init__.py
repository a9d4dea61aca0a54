"""`pneumo serve`: a DICOM node next to a PACS.

A Storage SCP receives chest X-rays (:mod:`~pneumo_cli.serve.node`), stores each one in the inbox
before acknowledging it (:mod:`~pneumo_cli.serve.intake`, :mod:`~pneumo_cli.serve.inbox`), a
worker with the model loaded once segments them (:mod:`~pneumo_cli.serve.worker`) and a sender
C-STOREs each DICOM SEG to the PACS, retrying while it is down (:mod:`~pneumo_cli.serve.outbox`);
:func:`~pneumo_cli.serve.service.serve` ties them together. Nothing here prints: events go to a
``log(event, **fields)`` callback that the command line renders.
"""
