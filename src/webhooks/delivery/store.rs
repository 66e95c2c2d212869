//! `webhook_deliveries` and `webhook_attempts` queries.

// --- reads and changes for the WebhookService delivery RPCs ---

// --- the pipeline: fan-out and worker ---
