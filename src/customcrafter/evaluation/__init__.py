"""Evaluation: the paper's metrics plus motion, the protocol (`customcrafter evaluate`) and the report.

Entry point: :func:`customcrafter.evaluation.protocol.evaluate`; prompt set: :mod:`customcrafter.evaluation.prompts`.
"""
