//! The creative-generation proxy (issue 8): generations over RabbitMQ, and reads of the
//! platform's Asset and User/Team services.

pub mod upstream;
