"""Device profiles (TOML): hardware figures and the budgets the product must stay under."""
