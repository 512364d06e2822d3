"""Herald's domain: models and the rules of campaigns. Imports neither Flask nor Huey."""
