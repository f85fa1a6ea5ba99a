"""Memory planning before any weight loads: parts (parts.py), fake-tensor step traces (trace.py), the plan
(planner.py), its text and advice (report.py); architectures supply a PlanModel (model.py)."""
