"""Alarms: threshold rules with a duration on any metric (like CloudWatch alarms), their
state machine, the defaults every database gets, and notifications (events, webhooks).

model.py the definition and state, validated once; rules.py the pure evaluation
(statistics, rates, ratios, missing data); defaults.py the defaults per database;
notify.py webhooks; evaluator.py the controller's step that evaluates every 10 s.
"""
