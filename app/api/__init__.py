"""HTTP layer: routes, schemas, the error envelope. Never imports torch."""
