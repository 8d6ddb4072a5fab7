"""Evaluation: accuracy of the main net and of every sub-network on re-estimated BatchNorm statistics
and destruction tests (`subnets`), the evaluation pass that training and `st-scale eval` both run
(`passes`), a checkpoint opened for evaluation (`trained`), sub-networks exported as models of their
own (`export`), and the figures."""
