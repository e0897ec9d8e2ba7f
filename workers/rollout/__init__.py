"""Model rollout: several versions side by side (sticky A/B split, shadow), hot reload, guardrails, comparison."""
