"""The lab: experiments that show what batch normalization does."""
