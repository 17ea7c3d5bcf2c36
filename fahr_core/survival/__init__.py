"""Survival statistics used to judge how well a risk score orders patients by outcome."""
