"""Work: tasks, containers, bundle uploads, the notifications they raise, and what a crash left."""
