"""Hostile cases: inputs and events an attacker or an unlucky user produces.

Every case that once went wrong stays here, beside the ones that held, so none comes back:
outputs that overlap inputs, overwrite of foreign data, bad requests among good ones, kills
during commit, malformed specs, models and heads. One module per area.
"""
