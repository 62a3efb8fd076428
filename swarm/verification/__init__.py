"""Refereed verification (Verde): commit to every operator output of a span's forward, and settle a
disagreement between two parties by bisection down to one operator that a referee recomputes.

determinism: the settings and profile that make results bit-reproducible; trace: recording and
recomputing operators; merkle: digests, Merkle trees and commitments; dispute: the bisection game.
"""
