DROP TABLE metered_usage;
