"""Lifecycle hooks: operator commands run after a rotation's phases (certbot's deploy hooks).

``process`` runs one command safely, ``ledger`` records each run in the state database so it
happens at least once across crashes, ``runner`` decides what runs when and applies the policies.
"""
