"""The compiler: analysis and rewrite passes over captured FX graphs."""
