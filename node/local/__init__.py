"""What a volunteer holds locally: the base model, its data, the inner trainer."""
