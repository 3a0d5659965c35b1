"""The cost model: hardware descriptions, model shapes, memory budgets, predicted decode cost of each
placement plan, and their ranking. Pure arithmetic over descriptions: it never imports the runtime."""
