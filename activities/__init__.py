"""Side effects: ledger appends, calls to the payment processor, reading statements."""
